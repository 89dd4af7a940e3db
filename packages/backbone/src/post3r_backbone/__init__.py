"""post3r_backbone."""
