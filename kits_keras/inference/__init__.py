"""Prediction on whole CTs: sliding window, clean-up, SavedModel export."""
