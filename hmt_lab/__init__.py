"""hmt_lab: training, evaluation, exercises, corpora, the chat and demo recipes, and the `hmt` command.

It builds on hmt_core (the model library serving needs) and hmt_client (`hmt chat`); nothing here is
imported by hmt_core or the service.
"""
