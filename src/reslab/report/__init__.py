"""Layer ``report``: tables, sentences and figures from stored results (a comparison's
results folder, or one run folder). Reads what ``reslab.study`` decides; computes no
decision of its own.
"""
