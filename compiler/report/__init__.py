"""What a build says about itself: report.json, the accuracy card (report.md + plots),
manifest.json and `llmc inspect`.
"""
