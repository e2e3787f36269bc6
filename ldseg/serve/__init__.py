"""`ldseg-serve`: a warm segmentation service on Ray Serve.

    ldseg-serve --checkpoint knee3d.safetensors          # http://127.0.0.1:8000
    curl --data-binary @scan.nii.gz 127.0.0.1:8000/v1/segment -o scan_seg.nii.gz

Each replica (app.SegmentService) builds its backend once through ldseg.api.Segmenter (the same
selection and artifact cache as ldseg-run), warms it up on a phantom, and then segments uploads
(uploads.py: size limits, format detection, safe zip extraction) or DICOMweb series (dicomweb.py)
through the same steps ldseg-run uses (pipeline.py), so its files are ldseg-run's files. Errors
become HTTP statuses in one place (errors.py); metrics.py holds the ldseg histograms Ray exports.

Layering: ldseg.serve imports ldseg.api, ldseg.errors, ldseg.io and the run orchestration; nothing
else in ldseg imports ldseg.serve (the CLI, ldseg/cli/serve.py, sits above it).
"""
