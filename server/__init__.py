"""
The HTTP layer of api_server.py: one Flask blueprint per API family, the helpers they share, the
key checks, metrics, the OpenAPI document and the playground. The model core (model.py,
generate.py, lut.py, ...) stays at the top level and knows nothing of HTTP.
"""
