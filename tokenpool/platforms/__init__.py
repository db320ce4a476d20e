"""Facts about the hardware the engine runs on."""
