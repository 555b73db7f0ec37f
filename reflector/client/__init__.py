"""The appliance side: the Paramedic Link client and the measurement clients built on it."""
