"""Framework integrations: Lightning, Hugging Face and plain loops (installed as ``runctl.integrations``)."""
