"""post3r_slots."""
