"""The Ray Serve application: ``app.py`` (the Ingress and the builder serve/config.yaml names),
``deployments.py`` (the model deployments), ``local.py`` (a private Serve for ``faceage up``)."""
