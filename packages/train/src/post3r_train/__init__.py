"""post3r_train."""
