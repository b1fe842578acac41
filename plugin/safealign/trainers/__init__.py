"""Subclasses of OpenRLHF trainers (import them from their modules: they pull in OpenRLHF)."""
