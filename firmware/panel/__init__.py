"""The appliance side of the front panel: the link codec (`codec`), what the panel is
shown and may do (`actions`), and the serial-port service (`service`)."""
