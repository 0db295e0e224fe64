"""DICOM CT series in, DICOM SEG (and synthetic series) out."""
