"""What people look at: figures (on ``matplotlib.figure.Figure``, never a pyplot backend), the
offline ``report.html`` and the dataset explorer."""
