"""DeepGlobe land-cover data: loading, preparation and a synthetic generator."""
