"""What transferkit shows a person: self-contained HTML pieces (html.py), the run's page
(run.py), matplotlib figures (plots.py) and Grad-CAM maps (gradcam.py)."""
