"""The TUI's screens: browse (samples), run (per-round curves), live, and modal dialogs."""
