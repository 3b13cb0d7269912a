"""Chat formats of the other families register here by importing their modules."""
