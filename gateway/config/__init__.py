"""The YAML contract: the schema (`schema`), the checks it is built from (`checks`), reading a file
(`load`), and the checks that touch the world (`preflight`)."""

from gateway.config.load import load, parse
from gateway.config.preflight import Prepared, preflight
from gateway.config.schema import (
                                   DEFAULT_PATH,
                                   DEVICE_CLASSES,
                                   SIM_PROFILES,
                                   Config,
                                   CounterSection,
                                   Device,
                                   DeviceBase,
                                   FaultSection,
                                   GatewaySection,
                                   LocalBrokerSection,
                                   LocalClientSection,
                                   ModbusRtuDevice,
                                   ModbusTcpDevice,
                                   MqttDevice,
                                   OeeSection,
                                   OutboxSection,
                                   PlcSection,
                                   PublishSection,
                                   ReconnectSection,
                                   RegisterSection,
                                   SerialSection,
                                   ShiftSection,
                                   SimDevice,
                                   TlsSection,
                                   UpstreamSection,
)
from gateway.errors import ConfigError

__all__ = ["DEFAULT_PATH", "DEVICE_CLASSES", "SIM_PROFILES", "Config", "ConfigError", "CounterSection", "Device",
           "DeviceBase", "FaultSection", "GatewaySection", "LocalBrokerSection", "LocalClientSection",
           "ModbusRtuDevice", "ModbusTcpDevice", "MqttDevice", "OeeSection", "OutboxSection", "PlcSection",
           "Prepared", "PublishSection", "ReconnectSection", "RegisterSection", "SerialSection", "ShiftSection",
           "SimDevice", "TlsSection", "UpstreamSection", "load", "parse", "preflight"]
