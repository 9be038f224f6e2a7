"""``featuredict demo``: an offline dictionary from nothing but pip."""
