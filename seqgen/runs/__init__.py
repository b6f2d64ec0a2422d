"""A phase's life in the tracking store: tracking (the only module that talks to MLflow), the
courier that delivers a run's records in order through outages (delivery), and the run keeper
that finds, claims, resumes and finishes a phase's run (phase_run)."""
