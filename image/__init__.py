"""Build of the flashable SD-card image: board profiles, partition layout, root tree."""
