"""Paper experiments end to end: configs in, results/ out."""
