"""Small things every layer uses: random streams and the names of the files a run writes."""
