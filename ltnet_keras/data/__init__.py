"""Reading, checking and preparing labelled volumes (numpy and nibabel only)."""
