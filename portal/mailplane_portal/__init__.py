"""The customer portal: each team sees and manages its own mail, in a browser and over HTTP.

It reads the relay's shared store (message log, suppression, erasure) and asks the Kubernetes
API who the caller is (TokenReview) and what they may do in each namespace
(SubjectAccessReview). See docs/portal.md.
"""
