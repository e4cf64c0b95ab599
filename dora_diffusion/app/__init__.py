"""The comparison page (``python app.py``): layout (``ui``), what its buttons do (``events``), how its form is
read and checked (``form``) and the Analysis tab (``analysis``)."""
