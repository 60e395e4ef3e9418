"""What the ABI defines, nothing that acts: registers and masks, status codes, the control value."""
