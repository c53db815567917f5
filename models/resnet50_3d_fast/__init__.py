"""The seeds' import path; the implementation lives in gliograde.networks."""
