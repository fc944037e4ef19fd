"""The evaluation report: `evaluation.html`, every evaluated sample with its images, question, reference and
answers before and after training, the metric over the run, and per-class results for closed label sets.

`page.py` turns samples and evaluation records into the page (one self-contained file, `template.html` filled
with the data as JSON); `run.py` keeps a finetuning run's report up to date and writes predict.py's.
"""
