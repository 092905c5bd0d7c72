"""Where image bytes come from: uploads and base64 (images.py decodes them), http(s) and s3:// URLs (urls.py,
objectstore/), CVAT manifests (manifest.py) and video (video.py, the one PyAV home)."""
