"""S3-compatible object storage (Backblaze B2 first): s3:// URLs, one boto3 client per storage profile and
attempt budget, a revalidated cache of downloaded objects, prefix listings, and job output uploads."""
