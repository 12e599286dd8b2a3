"""The TUI's own widgets: line-drawn (Textual's line API) where they draw data."""
