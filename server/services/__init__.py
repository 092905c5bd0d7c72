"""What the server does, without HTTP (no FastAPI import here): SAM clicks on cached embeddings, detection,
tracking, prefetch and CVAT warm-up, and the image collections they enumerate."""
