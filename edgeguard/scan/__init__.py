"""Batch scans of JSONL files: ``writer`` (the resumable output), ``record`` (the scan record that
makes a resume safe), ``formats`` (input shapes), ``ray`` (the same scan on Ray Data).
"""
