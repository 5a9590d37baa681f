"""`make demo`: Wattson on a fresh machine, serving real traffic."""
