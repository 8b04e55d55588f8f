"""How client updates become the round's sum: the flat round buffer (``buffer``), its exact
fixed-point grid (``exact``) and the transforms before and after the sum (``transforms``)."""
