# MirrorUnit front panel: MicroPython runs this at power-up.
import app
import hw

app.run(hw)
