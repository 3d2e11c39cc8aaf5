# MirrorUnit front panel: which pins the controller board uses (Raspberry Pi Pico /
# RP2040 wiring of docs/panel.md).  Another board changes this file only.

#: "usb": the protocol runs over the USB CDC serial port (/dev/ttyACM0 on the unit);
#: "uart": over UART0 on the pins below (the unit's /dev/serial0).
LINK = "usb"
UART_ID = 0
UART_TX = 0   # GP0
UART_RX = 1   # GP1
UART_BAUD = 115200

I2C_ID = 0
I2C_SDA = 4   # GP4
I2C_SCL = 5   # GP5
I2C_FREQ = 400000
#: "ssd1306": a 128x64 OLED (16 columns x 8 rows of text);
#: "hd44780": a character LCD through a PCF8574 I2C backpack (LCD_COLS x LCD_ROWS).
DISPLAY = "ssd1306"
OLED_ADDR = 0x3C
OLED_WIDTH = 128
OLED_HEIGHT = 64
LCD_ADDR = 0x27   # PCF8574 backpacks: 0x27 (PCF8574T) or 0x3F (PCF8574AT)
LCD_COLS = 16
LCD_ROWS = 2

#: Buttons to ground, internal pull-ups: (name, GPIO).
BUTTONS = (("up", 10), ("down", 11), ("select", 12), ("back", 13))
DEBOUNCE_MS = 30

LED_ACTIVITY = 16
LED_LINK = 17
LED_FAULT = 18
