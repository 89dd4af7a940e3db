"""post3r_data."""
