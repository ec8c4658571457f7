"""One thin module per command. Heavy imports happen inside the command functions."""
