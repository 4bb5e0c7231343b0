"""Pure tensor maths for each method, one subpackage per method (naive reference beside fast paths)."""
