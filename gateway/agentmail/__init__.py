"""The agents' mail path (DESIGN 3a): replies, notes and commands sent through submission."""
