"""`latentdiff serve`: a local web page (Gradio) to generate images from a prior run and watch training.

generation.py and runs.py hold the request logic and know nothing of the web framework (the tests
call them directly); app.py lays out the page and wires its events.
"""
