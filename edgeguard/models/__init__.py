"""Where models come from: ``registry`` (models.toml), ``hub`` (downloads with pinned revisions and
sha256), ``store`` (the local cache of converted models), ``manifest`` (what a converted folder
holds), ``formats`` (file names and kinds of a folder).
"""
