DROP TABLE replicas;
DROP TABLE audit_log;
DROP TABLE layer_switches;
