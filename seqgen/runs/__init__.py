"""A phase's life in the tracking store and on disk: tracking (the only module that talks to
MLflow), the courier that delivers a run's records in order through outages (delivery), the run
keeper that finds, claims, resumes, pauses and finishes a phase's run (keeper), the phase's local
folder with the original's file names (outputs), and what runs and models say about themselves
(descriptions)."""
