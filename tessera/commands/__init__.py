"""The `tessera` command families; importing one registers its commands on tessera.app.app."""
