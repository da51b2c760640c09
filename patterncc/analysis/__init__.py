"""Stage 3: facts about a bound pattern (layout, density, cost, coverage, permutations)."""
