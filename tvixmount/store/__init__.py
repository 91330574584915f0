"""Store backends behind one interface, opened by URL."""
