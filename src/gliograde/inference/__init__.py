"""Using trained folds on new cases: the fold ensemble (predict) and Grad-CAM saliency maps."""
