"""The network: backbone registry and the age-regression model (``AgeNet``)."""
