"""Federation PKI: the CA, the gateway/SuperLink certificate and SuperNode keys."""
